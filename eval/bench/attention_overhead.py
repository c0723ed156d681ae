"""Wall-time cost of the last-block [CLS] attention score on the student forward (ViT-S/16, batch
16, 224 px, CPU): plain and scored forwards alternate, 15 rounds, medians. Target: < 1%.
Run: .venv/bin/python eval/bench/attention_overhead.py
"""

import statistics
import time

import torch

from ssl_kd.models.backbone import create_backbone

torch.manual_seed(0)
b = create_backbone("vit_small_patch16_224", 224).eval()
x = torch.randn(16, 3, 224, 224)
t = {"plain": [], "attn": []}
with torch.inference_mode():
    for _ in range(2):
        b(x)
        b(x, cls_attention=True)
    for i in range(15):
        order = ["plain", "attn"] if i % 2 == 0 else ["attn", "plain"]
        for k in order:
            s = time.perf_counter()
            b(x, cls_attention=(k == "attn"))
            t[k].append(time.perf_counter() - s)
m = {k: statistics.median(v) for k, v in t.items()}
print(m, f"overhead {100 * (m['attn'] / m['plain'] - 1):+.2f}%")
