"""Research testbeds where every quantity is exact: the population testbed over calibrated cells and the
tiny-LM testbed that enumerates every response (docs/lm_testbed.md)."""
