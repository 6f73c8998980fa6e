"""Calibration loop for issue 22 (not in the repo): does copying form, and does it transfer?

python calib.py NAME key=value ...   (resumable: state in /tmp/calib/NAME/)
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, "/work/main")
from data.config import DataConfig  # noqa: E402
from data.corpus import prepare  # noqa: E402
from models.transformer import ModelConfig, TransformerLM  # noqa: E402
from pipeline.span_probe import probe  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "1")))

A = dict(
    attention="dense", norm="pre", position="rope", init="torch", tie=0, d_model=128, n_layer=2,
    n_head=4, d_ff=512, vocab=2048, lr=2e-3, tokens=8192, warmup=50,
    # stages: "len:steps:mix,len:steps:mix"  mix = fraction of synthetic windows
    stages="128:1500:0.5,512:1500:0.0", mixkind="randrep", eval_every=100, min_lr=0.1,
    seg="64,128,256,512", dil="1,2,4,8", seed=1, alphabet=0, load="",
)
name = sys.argv[1]
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    A[k] = type(A[k])(v) if not isinstance(A[k], str) else v
out = f"/tmp/calib/{name}"
os.makedirs(out, exist_ok=True)
torch.manual_seed(A["seed"])
rng = np.random.default_rng(A["seed"])

corpus = prepare(DataConfig(vocab_size=A["vocab"], seq_len=512, cache_dir="/work/main/.cache/data"))
train, val = corpus.split("train"), corpus.split("val")
V = corpus.vocab_size
counts = np.bincount(np.asarray(train.tokens[:2_000_000]), minlength=V)
TOP = np.argsort(-counts)[: (A["alphabet"] or V)]
mc = ModelConfig(
    vocab_size=V, d_model=A["d_model"], n_layer=A["n_layer"], n_head=A["n_head"], d_ff=A["d_ff"],
    attention=A["attention"], norm=A["norm"], position=A["position"], init=A["init"],
    tie_embeddings=bool(A["tie"]), segment_lengths=[int(x) for x in A["seg"].split(",")],
    dilation_rates=[int(x) for x in A["dil"].split(",")],
)
net = TransformerLM(mc)
decay = [p for p in net.parameters() if p.dim() >= 2]
opt = torch.optim.AdamW(net.parameters(), lr=A["lr"], betas=(0.9, 0.98), weight_decay=0.0)
stages = [tuple(float(x) for x in s.split(":")) for s in A["stages"].split(",")]
total = int(sum(s[1] for s in stages))

# validation: in-document windows of 512 (+1), 48 windows; span probe on 16 windows
vdocs = [i for i in range(len(val.lengths)) if val.lengths[i] >= 1100]
starts = []
for d in vdocs:
    b, n = int(val.starts[d]), int(val.lengths[d])
    starts += [b + o for o in range(0, n - 513, 513)]
starts = np.asarray(starts)[np.random.default_rng(0).permutation(len(starts))[:48]]
VW = torch.from_numpy(np.stack([val.tokens[s : s + 513].astype(np.int64) for s in starts]))


def synth(L):
    """(L+1) tokens, labels mask: a random-token sequence repeated; first copy unscored."""
    kind = A["mixkind"]
    if kind == "randrep":
        m = int(rng.integers(4, max(5, L // 2)))
        seq = TOP[rng.integers(0, len(TOP), size=m)]
        reps = -(-(L + 1) // m)
        x = np.tile(seq, reps)[: L + 1]
        mask = np.ones(L + 1, bool)
        mask[:m] = False  # unpredictable first copy
        return x, mask
    if kind == "natrep":  # a natural window whose own span repeats later
        s = int(rng.integers(0, len(train.tokens) - L - 2))
        x = train.tokens[s : s + L + 1].astype(np.int64).copy()
        m = int(rng.integers(8, max(9, L // 4)))
        a = int(rng.integers(0, L + 1 - 2 * m))
        b = int(rng.integers(a + m, L + 2 - m))
        x[b : b + m] = x[a : a + m]
        mask = np.ones(L + 1, bool)
        return x, mask
    raise ValueError(kind)


def batch(L, mix):
    B = max(1, A["tokens"] // L)
    xs, ms = [], []
    for _ in range(B):
        if rng.random() < mix:
            x, m = synth(L)
        else:
            s = int(rng.integers(0, len(train.tokens) - L - 2))
            x = train.tokens[s : s + L + 1].astype(np.int64)
            m = np.ones(L + 1, bool)
        xs.append(x)
        ms.append(m)
    x = torch.from_numpy(np.stack(xs))
    m = torch.from_numpy(np.stack(ms))
    y = x[:, 1:].clone()
    y[~m[:, 1:]] = -100
    return x[:, :-1], y


def lr_at(step):
    if step < A["warmup"]:
        return A["lr"] * (step + 1) / A["warmup"]
    t = (step - A["warmup"]) / max(1, total - A["warmup"])
    return A["lr"] * (A["min_lr"] + (1 - A["min_lr"]) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate():
    net.eval()
    h = net.hidden(VW[:, :-1])
    logp = F.log_softmax(net.lm_head(h).float(), -1)
    nll512 = -logp.gather(-1, VW[:, 1:, None]).squeeze(-1).double()  # (W, 512)
    # context 64: last 64 tokens of each window scored with 64 context? Use disjoint 64 windows
    x64 = VW[:, :512].reshape(-1, 64)
    y64 = VW[:, 1:513].reshape(-1, 64)
    lp = F.log_softmax(net(x64).float(), -1)
    nll64 = -lp.gather(-1, y64[..., None]).squeeze(-1).double()
    pos = nll512.mean(0)
    buckets = {f"{a}-{b}": float(pos[a:b].mean()) for a, b in
               [(0, 8), (8, 32), (32, 64), (64, 128), (128, 256), (256, 512)]}
    rows = probe(net, VW[:16], span=32)
    net.train()
    return dict(ppl512=math.exp(nll512.mean()), ppl64=math.exp(nll64.mean()),
                ratio=1 - math.exp(nll512.mean()) / math.exp(nll64.mean()),
                pos=buckets, span={r["distance"]: round(r["drop"], 3) for r in rows})


ck = f"{out}/state.pt"
step, tokens, t_train = 0, 0, 0.0
if os.path.exists(ck):
    st = torch.load(ck, weights_only=False)
    net.load_state_dict(st["net"]); opt.load_state_dict(st["opt"])
    step, tokens, t_train = st["step"], st["tokens"], st["t"]
    rng = st["rng"]
if step == 0 and A["load"]:
    net.load_state_dict(torch.load(A["load"], weights_only=False)["net"])
log = open(f"{out}/log.jsonl", "a")
if step == 0:
    log.write(json.dumps({"args": A}) + "\n")
    log.write(json.dumps({"step": 0, **evaluate()}) + "\n"); log.flush()
while step < total:
    acc = 0
    for L, n, mix in stages:
        acc += n
        if step < acc:
            break
    L = int(L)
    t0 = time.time()
    x, y = batch(L, mix)
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    h = net.hidden(x)
    logits = net.lm_head(h).float()
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    t_train += time.time() - t0
    step += 1
    tokens += x.numel()
    if step % A["eval_every"] == 0 or step == total:
        r = {"step": step, "L": L, "tokens": tokens, "t": round(t_train), "loss": float(loss), **evaluate()}
        log.write(json.dumps(r) + "\n"); log.flush()
        print(json.dumps(r), flush=True)
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step,
                    "tokens": tokens, "t": t_train, "rng": rng}, ck + ".tmp")
        os.replace(ck + ".tmp", ck)
