"""The method itself, as the paper describes it: depth samplers (LVPS and the ablations), layer maps and
growth, the stage schedule, the learning-rate schedule, and the methods table (``table.METHOD_TABLE``)
that combines them into Scratch, StackBERT, Apollo and the other progressive methods.
"""
