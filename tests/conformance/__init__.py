"""The transport conformance suite (suite.py), written once and run against every transport."""
