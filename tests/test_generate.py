"""generate.py on a tiny trained run: greedy text equals a loop over the full forward, streaming,
seeded samples, the JSON, prompts from files and stdin, and bad input named with exit 2."""

import io
import json
import sys

import pytest
import torch

from generate import load_generate_config, main
from pipeline.scoring import load_checked
from pipeline.training import train
from settings.cli import run_cli
from tests.support.corpus import write_corpus
from tests.support.runs import tiny_run

PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    write_corpus(root / "corpus")
    run_dir = root / "run"
    train(tiny_run(root, run_dir, "trainer.max_steps=2"))
    return str(run_dir / "checkpoints" / "last.ckpt")


def args(ckpt, *extra):
    return [f"checkpoint={ckpt}", f"prompt={PROMPT}", "max_new_tokens=12", *extra]


def test_greedy_tokens_equal_a_loop_over_the_full_forward(ckpt):
    """Reference twin: the whole sequence through the model for every new token."""
    got = main(
        args(ckpt, "temperature=0", "stop_at_eos=false", "stream=false", "max_new_tokens=40")
    )
    net = load_checked(ckpt, {}, False, torch.device("cpu")).net
    from generate import encode, tokenizer_of

    tokens = torch.tensor([encode(tokenizer_of(ckpt), PROMPT)])
    with torch.no_grad():
        for _ in range(40):  # past the tiny model's segments (8, 16) and training length (32)
            tokens = torch.cat([tokens, net(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert got["samples"][0]["tokens"] == tokens[0, got["prompt_tokens"] :].tolist()


def test_the_first_sample_streams_and_every_sample_is_printed(ckpt, capsys):
    result = main(args(ckpt, "num_samples=3", "stop_at_eos=false"))
    out = capsys.readouterr().out
    texts = [s["text"] for s in result["samples"]]
    assert out.startswith(f"--- sample 0 ---\n{PROMPT}{texts[0]}\n")
    for i in (1, 2):
        assert f"--- sample {i} ---\n{PROMPT}{texts[i]}\n" in out
    single = main(args(ckpt, "stop_at_eos=false"))
    assert capsys.readouterr().out == PROMPT + single["samples"][0]["text"] + "\n"


def test_seeded_samples_are_reproducible_and_the_json_says_tokens_per_second(ckpt, tmp_path):
    out = tmp_path / "samples.json"
    first = main(args(ckpt, "num_samples=2", "seed=5", "top_k=50", "top_p=0.9", f"out={out}"))
    again = main(args(ckpt, "num_samples=2", "seed=5", "top_k=50", "top_p=0.9"))
    other = main(args(ckpt, "num_samples=2", "seed=6", "top_k=50", "top_p=0.9"))
    assert first["samples"] == again["samples"] != other["samples"]
    written = json.loads(out.read_text())
    assert written["samples"] == first["samples"] and "commit" in json.dumps(written["meta"])
    assert written["prefill_tokens_per_s"] > 0 and written["decode_tokens_per_s"] > 0
    assert written["config"]["seed"] == 5 and written["cache_mib"] > 0


def test_prompt_from_a_file_and_from_stdin(ckpt, tmp_path, monkeypatch):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT, encoding="utf-8")
    greedy = ("temperature=0", "stream=false", "max_new_tokens=6")
    inline = main(args(ckpt, *greedy))
    from_file = main([f"checkpoint={ckpt}", f"prompt_file={path}", *greedy])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(PROMPT.encode())))
    from_stdin = main([f"checkpoint={ckpt}", "prompt_file=-", *greedy])
    assert inline["samples"] == from_file["samples"] == from_stdin["samples"]


def exit_of(argv, capsys) -> tuple[int, str]:
    status = run_cli(main, argv, load=load_generate_config)
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, named",
    [
        (["temperature=-1"], "temperature must be >= 0 (0: greedy), got -1"),
        (["top_p=0"], "top_p must be in (0, 1], got 0"),
        (["top_p=1.5"], "top_p must be in (0, 1], got 1.5"),
        (["top_k=0"], "top_k must be a positive integer or null, got 0"),
        (["max_new_tokens=0"], "max_new_tokens must be at least 1, got 0"),
        (["prompt_file=x.txt"], "give exactly one of prompt=TEXT and prompt_file=PATH"),
        (["temprature=1"], "unknown key temprature"),
    ],
)
def test_bad_values_exit_2_naming_them(ckpt, capsys, extra, named):
    status, err = exit_of(args(ckpt, *extra), capsys)
    assert status == 2 and named in err


def test_bad_prompts_and_checkpoints_exit_2_naming_them(ckpt, capsys, tmp_path):
    status, err = exit_of(["checkpoint=nope.ckpt", "prompt=a"], capsys)
    assert status == 2 and "checkpoint 'nope.ckpt' does not exist" in err
    status, err = exit_of([f"checkpoint={ckpt}", "prompt="], capsys)
    assert status == 2 and "prompt must not be empty" in err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    status, err = exit_of([f"checkpoint={ckpt}", f"prompt_file={latin1}"], capsys)
    assert status == 2 and f"prompt_file={str(latin1)!r} is not UTF-8" in err
    status, err = exit_of([f"checkpoint={ckpt}", f"prompt_file={tmp_path / 'none.txt'}"], capsys)
    assert status == 2 and "none.txt" in err and "cannot be read" in err
    status, err = exit_of(["prompt=a"], capsys)
    assert status == 2 and "checkpoint=PATH is required" in err


def test_print_config_shows_the_resolved_command_line(capsys):
    status = run_cli(main, ["checkpoint=a.ckpt", "prompt=hi", "top_k=5", "--print-config"],
                     load=load_generate_config)  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "top_k: 5" in out and "checkpoint: a.ckpt" in out


@pytest.fixture(scope="module")
def recall_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    recall = ["data.source=recall", "data.seq_len=64", "data.batch_size=4", "data.num_workers=0",
              "model.segment_lengths=[16,32]", "model.dilation_rates=[1,2]"]  # fmt: skip
    train(tiny_run(root, root / "run", "trainer.max_steps=8", *recall))
    return str(root / "run" / "checkpoints" / "last.ckpt")


def test_recall_by_greedy_generation_agrees_with_teacher_forcing(recall_ckpt):
    """The answers generated after ``ASK k`` are the ones the teacher-forced probe marks
    correct, query by query, at the training length and twice it (beyond every segment)."""
    from pipeline import recall_generation, recall_probe

    model = load_checked(recall_ckpt, {}, False, torch.device("cpu"))
    cpu = torch.device("cpu")
    forced = recall_probe.score(model, [64, 128], None, 6, 4096, cpu)
    generated = recall_generation.score(model, [64, 128], None, 6, 3, cpu)
    assert [(r["length"], r["distance"], r["queries"], r["correct"]) for r in forced] == [
        (r["length"], r["distance"], r["queries"], r["correct"]) for r in generated
    ]
    assert sum(r["queries"] for r in generated) > 0
    from data.batch import scored
    from data.recall import RecallSet, RecallTask

    data = RecallSet(RecallTask.of(model.data), model.data.seed, "test", 4, 128, distance=32)
    inputs = torch.stack([data[i]["input_ids"] for i in range(4)])
    labels = torch.stack([data[i]["labels"] for i in range(4)])
    keep = scored(labels)
    with torch.no_grad():
        teacher = model.net(inputs).argmax(-1)
    answers = recall_generation.generated_answers(model.net, inputs, labels)
    assert torch.equal(answers[keep], teacher[keep])
