"""Quantization-aware fine-tuning: L4Q, LR-QAT, the QLoRA-style baseline, full LSQ QAT and plain LoRA.

grid.py      the quantizer core shared by training and export (lowbit's UniformGrid, fp16 s, integer z)
l4q.py       L4Q layer and its memory-saving autograd Function (also full-weight LSQ QAT)
lr_qat.py    LR-QAT layer (low-rank term inside the rounding, in grid units)
lora.py      LoRA beside a frozen float or PTQ weight (plain LoRA, QLoRA-style)
config.py    one pydantic config per method + TrainConfig
data.py      training windows, loss masks, the stateless batch order
prepare.py   module swap and initial grids (L4Q_init, RTN, GPTQ)
trainer.py   the training loop (data-parallel, checkpoints, resume), export.py the final export
cli.py       `lowbit finetune`
"""
