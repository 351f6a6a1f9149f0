"""Studies: experiments that compose the library and own their data and prose (verdicts,
reports). The library never imports them (``tests/test_layers.py`` checks it).

* ``digits``: the split-digits experiment (Soup to go, Figure 1) behind ``mergelab sfa --digits``.
* ``scale``: merging at scale and LM-Cocktail along model size and base kind (issue 15), behind
  ``mergelab study scale`` (docs/scale-study.md).

The demo world and ``mergelab demo`` are a study too; they live in ``mergelab.demo``.
"""
