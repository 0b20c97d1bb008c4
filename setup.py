"""trime-fairseq: TRIME and memory-augmented LMs as a fairseq ``--user-dir`` plugin.

fairseq itself is installed separately (see ``scripts/setup.sh``): on Python 3.11 the
working build is ``fairseq-fixed==0.12.3.1`` installed with ``--no-deps`` (its metadata
pulls in torchaudio and a second torch).
"""
from setuptools import find_packages, setup

setup(
    name="trime-fairseq",
    version="0.1.0",
    description="TRIME, kNN-LM, kNN-MT and memory-augmented LMs as a fairseq plugin",
    packages=find_packages(include=["trime_fairseq", "trime_fairseq.*"]),
    python_requires=">=3.9",
    # exactly the third-party packages the plugin imports (tests/test_packaging.py checks it);
    # fairseq and its own run-time needs are installed by scripts/setup.sh
    install_requires=[
        "torch>=2.0",
        "numpy<2",
        "omegaconf==2.3.0",
        "faiss-cpu",
        "scipy",
        "sentencepiece",
        "tqdm",
        "matplotlib",
    ],
    # examples/ score BLEU with sacrebleu; the tests run the examples
    extras_require={"examples": ["sacrebleu"], "test": ["pytest", "pytest-xdist", "rank-bm25", "ruff", "sacrebleu"]},
    entry_points={
        "console_scripts": [
            "trime-prepare-lm = trime_fairseq.cli.prepare_lm:main",
            "trime-prepare-mt = trime_fairseq.cli.prepare_mt:main",
            "trime-tune = trime_fairseq.cli.tune:main",
            "trime-build-datastore = trime_fairseq.cli.build_datastore:main",
            "trime-analyze = trime_fairseq.cli.analyze:main",
            "trime-near-dups = trime_fairseq.cli.near_dups:main",
            "trime-tune-mt = trime_fairseq.cli.tune_mt:main",
            "trime-train-metak = trime_fairseq.cli.train_metak:main",
            "trime-inspect = trime_fairseq.cli.inspect:main",
        ]
    },
)
