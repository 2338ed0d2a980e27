"""Reports: console summary, Table 1, figures."""
