"""Whole studies that reproduce the paper's comparisons in small (run by ``vars-deq study``)."""
