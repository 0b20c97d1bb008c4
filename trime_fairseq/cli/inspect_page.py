"""The HTML page of ``trime-inspect``: one self-contained file (inline CSS and JS, the data
inline as JSON), nothing fetched at view time.

The data (:func:`trime_fairseq.cli.inspect.build_page_data`) is embedded once; the script
draws the text (tokens coloured by gain in bits: green = memory helped, red = it hurt) and
the panel that shows a hovered or clicked token: its probabilities, the share of each
memory kind, the model's top predictions and the memory entries that carried most mass,
each with the text around it (a click on an entry of this document jumps to it).
"""
import html
import json

CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; --card:#fff;
  --local:#2563eb; --long:#7c3aed; --ext:#ea580c; --datastore:#ea580c; --cache:#0d9488;
  --cache-long:#0f766e; --knn-memory:#db2777; --model:#9ca3af; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color:var(--fg);
  background:var(--bg); }
header { background:#24292f; color:#fff; padding:14px 24px; }
header h1 { margin:0 0 4px; font-size:18px; font-weight:600; }
header .meta { color:#c9d1d9; font-size:12.5px; }
header code { color:#fff; background:rgba(255,255,255,.12); padding:1px 5px; border-radius:4px; }
main { padding:16px 24px 32px; max-width:1500px; margin:0 auto; }
.cards { display:grid; grid-template-columns: 230px 1fr 1.25fr 1.35fr; gap:12px; margin-bottom:14px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px 14px; }
.card h2 { margin:0 0 6px; font-size:12px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); }
.big { font-size:26px; font-weight:600; }
.big small { font-size:13px; color:var(--muted); font-weight:400; }
.good { color:#15803d; } .bad { color:#b91c1c; }
table { border-collapse:collapse; width:100%; font-size:12.5px; }
th, td { text-align:right; padding:2px 6px; border-bottom:1px solid #eaeef2; white-space:nowrap; }
th { color:var(--muted); font-weight:600; }
th:first-child, td:first-child { text-align:left; }
.chips { display:flex; flex-wrap:wrap; gap:4px; }
.chip { display:inline-block; padding:1px 7px; border-radius:10px; background:#dcfce7; color:#14532d;
  border:1px solid #86efac; font-size:12px; text-decoration:none; cursor:pointer; }
.chip b { font-weight:600; }
.legend { display:flex; align-items:center; gap:14px; flex-wrap:wrap; font-size:12px; color:var(--muted);
  margin:4px 0 10px; }
.grad { width:180px; height:10px; border-radius:3px; border:1px solid var(--line);
  background:linear-gradient(90deg, rgba(220,38,38,.85), #fff, rgba(22,163,74,.85)); }
.kind { display:inline-block; padding:0 6px; border-radius:4px; color:#fff; font-size:11px; line-height:17px; }
.layout { display:grid; grid-template-columns: minmax(0, 1fr) 470px; gap:14px; align-items:start; }
#text { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px;
  font:13.5px/1.9 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space:pre-wrap;
  word-break:break-word; }
.t { border-radius:3px; cursor:pointer; padding:1px 0; }
.t.u { color:#8c959f; cursor:default; }
.t:hover { outline:1px solid #57606a; }
.t.sel { outline:2px solid #0969da; }
.t.flash { outline:2px solid #f59e0b; }
.nl { color:#c0c6cc; }
#panel { position:sticky; top:10px; background:var(--card); border:1px solid var(--line); border-radius:8px;
  padding:12px 14px; max-height:calc(100vh - 20px); overflow:auto; font-size:13px; }
#panel .tok { font:600 20px ui-monospace, Menlo, Consolas, monospace; background:#eef2ff; padding:0 6px;
  border-radius:4px; }
#panel h3 { margin:12px 0 4px; font-size:12px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); }
.bar { display:flex; height:14px; border-radius:3px; overflow:hidden; border:1px solid var(--line); }
.bar span { display:block; height:100%; }
.preds { display:grid; grid-template-columns:1fr 1fr; gap:8px; font-size:12.5px; }
.preds div span { font-family:ui-monospace, Menlo, monospace; background:#f3f4f6; padding:0 3px; border-radius:3px; }
.entry { border-top:1px solid #eaeef2; padding:5px 0; }
.entry .top { display:flex; gap:8px; align-items:baseline; font-size:12px; color:var(--muted); }
.entry .ctx { font:12.5px/1.5 ui-monospace, Menlo, monospace; color:#57606a; margin-top:2px; }
.entry .ctx mark { background:#fde68a; color:#111; border-radius:2px; padding:0 1px; }
.entry .hit { color:#15803d; font-weight:600; }
.entry a { color:#0969da; cursor:pointer; }
.hint { color:var(--muted); font-size:12px; }
@media (max-width: 1100px) { .cards { grid-template-columns: 1fr 1fr; } .layout { grid-template-columns: 1fr; } }
"""

JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const S = D.summary, M = D.meta, T = D.tokens;
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const vis = (s) => s.replace(/\n/g, '¶').replace(/^ /, '\u2423');
const f = (x, d=2) => (x === null || x === undefined) ? '–' : Number(x).toFixed(d);
const prob = (x) => x < 1e-3 ? x.toExponential(1) : x.toFixed(4);
const pct = (x) => (x === null || x === undefined) ? '–' : (100 * x).toFixed(1) + '%';
const KC = {local:'--local', long:'--long', ext:'--ext', datastore:'--datastore', cache:'--cache',
            'cache-long':'--cache-long', 'knn-memory':'--knn-memory', model:'--model'};
const kcol = (k) => `var(${KC[k] || '--model'})`;
const badge = (k) => `<span class="kind" style="background:${kcol(k)}">${esc(k)}</span>`;

function color(g) {
  if (g === null || g === undefined) return 'transparent';
  const a = Math.min(Math.abs(g) / 4, 1) * 0.85;
  return g >= 0 ? `rgba(22,163,74,${a.toFixed(3)})` : `rgba(220,38,38,${a.toFixed(3)})`;
}

function summary() {
  if (!S.tokens) { $('cards').innerHTML = '<div class="card">No scored token.</div>'; return; }
  const rel = 100 * (S.ppl_with / S.ppl_without - 1);
  let h = `<div class="card"><h2>Perplexity</h2>
    <div class="big">${f(S.ppl_with)} <small>with memory</small></div>
    <div>${f(S.ppl_without)} without · <span class="${rel <= 0 ? 'good' : 'bad'}">${rel >= 0 ? '+' : ''}${f(rel, 1)}%</span></div>
    <div class="hint">${S.tokens} tokens · ${f(S.bits_gained, 1)} bits gained (${f(S.bits_per_token, 3)}/token)<br>
    helped ${S.helped} · hurt ${S.hurt}</div>`;
  if (S.gates) h += `<div class="hint">kNN-attention gate per head: ${S.gates.map(g => f(g, 2)).join(' ')}</div>`;
  h += `</div>`;
  h += `<div class="card"><h2>Gain by memory kind</h2><table><tr><th>kind</th><th>mean share of p(target)</th>
    <th>tokens it leads</th><th>bits gained there</th></tr>`;
  for (const r of (S.by_kind || []))
    h += `<tr><td>${badge(r.kind)}</td><td>${r.mean_share === null ? '–' : pct(r.mean_share)}</td>
      <td>${r.tokens_led}</td><td>${f(r.bits_gained_led, 1)}</td></tr>`;
  if (!(S.by_kind || []).length) h += `<tr><td colspan="4" class="hint">no memory in use</td></tr>`;
  h += `</table></div>`;
  h += `<div class="card"><h2>By target frequency (in ${esc(M.where.split(' ')[0])})</h2><table>
    <tr><th>frequency</th><th>tokens</th><th>ppl w/o</th><th>ppl with</th><th>bits/token</th></tr>`;
  for (const r of S.by_frequency)
    h += `<tr><td>${esc(r.bucket)}</td><td>${r.tokens}</td><td>${f(r.ppl_without)}</td><td>${f(r.ppl_with)}</td>
      <td class="${(r.bits_per_token || 0) >= 0 ? 'good' : 'bad'}">${r.tokens ? f(r.bits_per_token, 3) : '–'}</td></tr>`;
  h += `</table></div>`;
  h += `<div class="card"><h2>Most helped by memory</h2><div class="chips">`;
  for (const r of S.most_helped)
    h += `<a class="chip" href="#t${r.i}" data-i="${r.i}" title="p ${f(r.p_without, 3)} → ${f(r.p_with, 3)}">${esc(r.text)} <b>+${f(r.gain_bits, r.gain_bits < 0.1 ? 2 : 1)}</b></a>`;
  if (!S.most_helped.length) h += `<span class="hint">memory helped no token</span>`;
  h += `</div></div>`;
  $('cards').innerHTML = h;
  for (const a of document.querySelectorAll('.chip')) a.onclick = (e) => { e.preventDefault(); jump(+a.dataset.i, true); };
}

function text() {
  const frag = document.createDocumentFragment();
  let lineStart = true;
  for (const t of T) {
    const s = document.createElement('span');
    s.id = 't' + t.i;
    s.className = 't' + (t.scored ? '' : ' u');
    let txt = t.text;
    if (txt.length > 1 && txt[0] === ' ') {  // the space goes outside the coloured token (none at a line start)
      if (!lineStart) frag.appendChild(document.createTextNode(' '));
      txt = txt.slice(1);
    }
    lineStart = txt === '\n';
    if (txt === '\n') { s.innerHTML = '<span class="nl">¶</span>\n'; }
    else s.textContent = txt;
    if (t.scored) {
      s.style.background = color(t.gain_bits);
      s.onmouseenter = () => { if (pinned === null) show(t.i); };
      s.onclick = () => { pin(t.i); };
    }
    frag.appendChild(s);
  }
  $('text').appendChild(frag);
}

let pinned = null;
function pin(i) {
  if (pinned !== null) $('t' + pinned).classList.remove('sel');
  pinned = (pinned === i) ? null : i;
  if (pinned !== null) $('t' + i).classList.add('sel');
  show(i);
}
function jump(i, select) {
  const el = $('t' + i);
  el.scrollIntoView({block: 'center', behavior: 'smooth'});
  el.classList.add('flash'); setTimeout(() => el.classList.remove('flash'), 1200);
  if (select && T[i].scored) { if (pinned !== i) pin(i); }
}

function show(i) {
  const t = T[i];
  const g = t.gain_bits;
  let h = `<div><span class="tok">${esc(vis(t.text))}</span>
    <span class="hint"> token ${t.i} · stream position ${t.pos} · frequency ${t.freq}</span></div>
    <div style="margin-top:6px">p(target) <b>${prob(Math.exp(t.lp_without))}</b> without memory →
    <b>${prob(Math.exp(t.lp_with))}</b> with · <span class="${g >= 0 ? 'good' : 'bad'}"><b>${g >= 0 ? '+' : ''}${f(g, 2)} bits</b></span></div>`;
  const sh = t.shares || {};
  if (Object.keys(sh).length) {
    h += `<h3>Share of p(target)</h3><div class="bar">`;
    for (const [k, v] of Object.entries(sh)) if (v > 0.0005) h += `<span title="${esc(k)} ${pct(v)}" style="width:${100 * v}%;background:${kcol(k)}"></span>`;
    h += `</div><div class="hint" style="margin-top:3px">` +
      Object.entries(sh).map(([k, v]) => `${badge(k)} ${pct(v)}`).join(' &nbsp;') + `</div>`;
  }
  h += `<h3>Top predictions</h3><div class="preds"><div>without: ` +
    t.top_without.map(([w, p]) => `<span>${esc(vis(w))}</span> ${f(p, 3)}`).join(', ') +
    `</div><div>with: ` + t.top_with.map(([w, p]) => `<span>${esc(vis(w))}</span> ${f(p, 3)}`).join(', ') + `</div></div>`;
  const E = t.entries || [];
  const nh = E.filter(e => e.label_id === t.id).length;
  h += E.length && E[0].head !== undefined ? `<h3>Retrieved by the kNN attention (gate × attention weight)</h3>`
    : `<h3>Memory entries: ${nh} labelled with the target, ${E.length - nh} strongest others</h3>`;
  if (!E.length) h += `<div class="hint">none</div>`;
  for (const e of E) {
    const hit = e.label_id === t.id;
    const where = e.kind === 'ext' || e.kind === 'datastore' ? `train pos ${e.pos}` : `pos ${e.pos}`;
    h += `<div class="entry"><div class="top">${badge(e.kind)}${e.head !== undefined ? ` head ${e.head}` : ''}
      <span>${e.head !== undefined ? 'gate×attn' : 'mass'} <b>${f(e.weight, 4)}</b></span>
      <span>sim ${f(e.sim, 3)}</span><span>${where}</span>
      <span class="${hit ? 'hit' : ''}">${e.head !== undefined ? 'token' : 'label'} “${esc(vis(e.label))}”${hit ? ' = target' : ''}</span>
      ${e.link !== undefined ? `<a data-link="${e.link}">show</a>` : ''}</div>`;
    if (e.context) h += `<div class="ctx">…${esc(e.context[0])}<mark>${esc(e.context[1])}</mark>${esc(e.context[2])}…</div>`;
    h += `</div>`;
  }
  $('panel').innerHTML = h;
  for (const a of $('panel').querySelectorAll('a[data-link]')) a.onclick = () => jump(+a.dataset.link, false);
}

function init() {
  const m = M;
  $('title').textContent = m.title;
  document.title = 'trime-inspect: ' + m.title;
  let meta = m.memory === 'none' ? (m.memorizing ? 'memory inside the model' : '<code>none</code>: no memory')
    : `<code>${esc(m.combiner)}</code> over <code>${esc(m.memory)}</code> memory`;
  if (m.long_memory_size) meta += ` · long-term ${m.long_memory_size} tokens`;
  if (m.datastore) meta += ` · datastore <code>${esc(m.datastore)}</code> (k=${m.knn_k}; ${esc(m.datastore_layout || '')})`;
  if (m.memorizing) meta += ` · Memorizing Transformer, kNN memory ${m.memorizing_memory_size} tokens, top-${m.memorizing_topk}`;
  meta += ` · blocks of ${m.tokens_per_sample} with ${m.context_window} context · <code>${esc(m.checkpoint)}</code>`;
  $('meta').innerHTML = meta;
  const kinds = [...new Set([...(m.kinds || []).filter(k => (S.by_kind || []).some(r => r.kind === k)),
                            ...(m.memorizing ? ['knn-memory'] : [])])];
  $('kinds').innerHTML = kinds.map(badge).join(' ') + (kinds.length ? ` ${badge('model')}` : '');
  summary(); text();
  const first = (S.most_helped && S.most_helped.length) ? S.most_helped[0].i : (T.find(t => t.scored) || {}).i;
  if (first !== undefined) pin(first);
}
init();
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trime-inspect</title>
<style>{css}</style></head>
<body>
<header><h1 id="title">{title}</h1><div class="meta" id="meta"></div></header>
<main>
<div class="cards" id="cards"></div>
<div class="legend"><span>memory hurt</span><span class="grad"></span><span>helped (±4 bits)</span>
<span>grey: not scored</span><span id="kinds"></span>
<span>hover a token to see what memory did; click to pin; entries marked “show” jump to their place</span></div>
<div class="layout"><div id="text"></div><div id="panel"><span class="hint">hover a token</span></div></div>
</main>
<script id="data" type="application/json">{data}</script>
<script>{js}</script>
</body></html>
"""


def render_page(data: dict) -> str:
    """The page for ``data`` (JSON-serialisable, finite floats) as one HTML string."""
    blob = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    return TEMPLATE.format(css=CSS, js=JS, data=blob, title=html.escape(data["meta"].get("title", "trime-inspect")))
