"""Downstream evaluation of a pretrained run: GLUE and SQuAD readers and metrics, fine-tuning with HF task
heads (the paper's Table 4), and zero-shot BLiMP.
"""
