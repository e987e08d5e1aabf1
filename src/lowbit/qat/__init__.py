"""Quantization-aware fine-tuning: L4Q, LR-QAT, the QLoRA-style baseline, full LSQ QAT, plain LoRA, OneBit,
LoQT and SpIEL.

grid.py      the quantizer core shared by training and export (lowbit's UniformGrid, fp16 s, integer z)
l4q.py       L4Q layer and its memory-saving autograd Function (also full-weight LSQ QAT)
lr_qat.py    LR-QAT layer (low-rank term inside the rounding, in grid units)
lora.py      LoRA beside a frozen float or PTQ weight (plain LoRA, QLoRA-style)
onebit.py, loqt.py, spiel.py   OneBit's sign ⊙ rank-1 layer, LoQT's merged factors, SpIEL's sparse Δ (with
             their step schedules); codebook_tuning.py the recipe stage's codebook layer
config.py    one pydantic config per method + TrainConfig
data.py      training windows, loss masks, the stateless batch order
prepare.py   module swap and initial grids (L4Q_init, RTN, GPTQ)
loop.py      the one optimisation loop (also the recipe stages and block reconstruction use it)
trainer.py   around it: data, evaluation, checkpoints (checkpoint.py), data parallelism (distributed.py),
             resume; export.py the final export
cli.py       `lowbit finetune`
"""
