"""Test utilities reused across the suite: multi-rank launches and the layout-parity harness."""
