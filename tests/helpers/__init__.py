"""Helpers shared by the tests, imported as ``tests.helpers.<module>`` (tests never import each
other or ``conftest``): :mod:`~tests.helpers.models` (tiny deterministic models),
:mod:`~tests.helpers.oracles` (brute-force reference computations), :mod:`~tests.helpers.paths`
(repository and shared-data paths) and :mod:`~tests.helpers.corpus` (the bad-input corpus)."""
