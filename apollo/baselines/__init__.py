"""Growth from a trained smaller model: bert2BERT (function-preserving / advanced-knowledge width growth
plus stacking) and LiGO (a learned linear growth operator). The loop in ``runtime.train`` starts these
methods from the grown model and then trains at full depth.
"""
