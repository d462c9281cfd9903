"""Compiled extensions (built from ext/*.pyx by setup.py). Only a few rram modules import these."""
