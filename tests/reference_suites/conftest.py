"""The vendored reference suites run against uniopt through tests/test_hct_suite.py (in a
subprocess, under the reference's module name); pytest does not collect them here."""

collect_ignore_glob = ["*"]
