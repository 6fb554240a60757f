"""Helpers shared by the tests (imported as ``helpers.<module>``; tests never import each other)."""
