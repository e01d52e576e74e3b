"""What a run costs and what it achieves: analytic training FLOPs by executed depth, ``apollo plan`` (a
method's stages and expected FLOPs without training), energy with codecarbon, the stability probe
around an expansion, and the report (the saving at Scratch's final loss, tables and plots).
"""
