"""Corpus preparation, run once before training: building blocks shared by every builder
(:mod:`~trime_fairseq.prepare.common`), language-modelling sources
(:mod:`~trime_fairseq.prepare.lm`, ``trime-prepare-lm``) and translation sources
(:mod:`~trime_fairseq.prepare.mt`, ``trime-prepare-mt``). Nothing here runs at training or
evaluation time."""
