import sys, torch, json
sys.path.insert(0, "/work/main")
from experiments.tools.calibrate_copying import validation_windows, build, arguments
from data.config import DataConfig
from data.corpus import prepare
import torch.nn.functional as F
from pipeline.span_probe import span_nll
torch.set_num_threads(1)
corpus = prepare(DataConfig(vocab_size=2048, seq_len=512))
W = validation_windows(corpus.split("val"))[:16]
for state, extra in [("/tmp/calib/H_D2dilated/state.pt", ["--attention", "dilated"]), ("/tmp/calib/D_a512/state_1100.pt", [])]:
    args = arguments(["x"] + extra)
    net = build(args, corpus.vocab_size); net.load_state_dict(torch.load(state, weights_only=False)["net"]); net.eval()
    inputs = W[:, :-1]; span = 32; start = 512 - span
    without = torch.cat([span_nll(net, w[None], start, span) for w in inputs])
    out = {}
    for d in [32, 33, 64, 65, 128, 129, 256, 257, 449]:
        c = inputs.clone(); c[:, start - d : start - d + span] = inputs[:, start:]
        w = torch.cat([span_nll(net, x[None], start, span) for x in c])
        out[d] = round(float((without - w).mean()), 3)
    print(extra, out)
