"""Studies: experiments that compose the library and own their data and prose (verdicts,
reports). The library never imports them (``tests/test_layers.py`` checks it).

* ``digits``: the split-digits experiment (Soup to go, Figure 1) behind ``mergelab sfa --digits``.

The demo world and ``mergelab demo`` are a study too; they live in ``mergelab.demo``.
"""
