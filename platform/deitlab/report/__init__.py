"""Reports: a sweep's ablation rows, DeiT Table 3 and the teacher comparison read back from tracking; tables for the
terminal, Markdown and HTML; plots; files written whole or not at all.
"""
