"""Evaluations of a pre-trained run: zero-shot, linear probe, fine-tuning, retrieval, AttMIM.

Kept free of torch imports: the command line reads its defaults from here before any model
code loads."""

#: most optimisation steps of a fine-tuning (``xlip eval finetune --steps``, ``xlip ablate
#: --finetune-steps``); it stops earlier on the validation AUC
FINETUNE_STEPS = 300
