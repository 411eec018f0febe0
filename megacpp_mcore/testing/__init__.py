"""Test harness shared by the test suite and by feature modules: multi-process gloo runs and the
single-rank-versus-parallel training comparison."""
