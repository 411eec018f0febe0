"""``megacpp-mcore generate``: continue C/C++ text with a checkpoint of ``megacpp-mcore train``, or of
Megatron-LM's ``pretrain_gpt.py`` run with one of our ``layer_specs`` objects (the launcher, the
recipes: model, settings and tokenizer come from the run's arguments, ``infer/megatron_lm.py``).

``megacpp-mcore generate --load DIR --prompt '#include <vector>'`` prints the continuation (bytes in,
bytes out; a run on BPE data keeps its tokenizer in its ``--save`` directory, which is used to
encode the prompt and decode the output); each prompt follows an end-of-document token, as every document
does in training, and a row stops at the next one). Several ``--prompt``/``--prompt-file`` make a
batch. ``--speculative K`` drafts K tokens per step with the model's trained MTP block (greedy
output is identical to ``--speculative 0``); ``--json`` prints tokens, text, timings, tokens/s and
the acceptance per draft position. Everything is checked before the model is loaded; generation
writes nothing but its output.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Heavy imports (torch, megatron-core) stay in run(): building the CLI parser must stay instant.
    parser.add_argument("--load", required=True, metavar="DIR",
                        help="checkpoint directory of `megacpp-mcore train --save DIR` or of "
                             "pretrain_gpt.py --save DIR with our --spec (latest step)")
    group = parser.add_argument_group("model (default: found from the checkpoint's signature)")
    group.add_argument("--preset", help="the preset it was trained as")
    group.add_argument("--pattern", help="the --pattern it was trained with")
    group.add_argument("--num-layers", type=int, help="the --num-layers it was trained with")
    group.add_argument("--seq-length", type=int,
                       help="its context, when trained with --seq-length (default: the preset's)")
    group = parser.add_argument_group("prompts (one or more; each is a row of the batch)")
    group.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="prompt text")
    group.add_argument("--prompt-file", action="append", default=[], metavar="PATH",
                       help="a UTF-8 text file (e.g. C/C++ source) as a prompt")
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    group.add_argument("--speculative", type=int, default=0, metavar="K",
                       help="MTP drafts per step, 1..the trained MTP depth (default 0: off)")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="greedy decoding, plain or speculative, replays one CUDA graph per "
                            "step (CUDA only; not with sampling)")
    group.add_argument("--compile-speculative", action="store_true",
                       help="with --cuda-graphs and --speculative K: the speculative step's own work "
                            "(the MTP drafter, the verification's bookkeeping) runs through "
                            "torch.compile, the trunk stays eager (fewer kernels per step; the "
                            "first step compiles)")
    group.add_argument("--plain-width", type=int, default=1, metavar="N",
                       help="plain decoding (no --speculative) runs each step over the pending token "
                            "and N - 1 dropped fillers: the shapes of a verification of N - 1 drafts, "
                            "so that in bf16 its output is --speculative N-1's token for token (with "
                            "--ssd-verify recurrent; default 1)")
    group.add_argument("--ssd-verify", default="quadratic", metavar="FORM",
                       help="how a verification keeps Mamba's per-position states: quadratic "
                            "(unmaterialised, the default), closed (materialised) or recurrent (one "
                            "position at a time with a plain step's arithmetic: bf16 identity, see "
                            "--plain-width)")
    group.add_argument("--backend", choices=["auto", "te", "local"], default="auto")
    group.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 weights/compute (default: on CUDA only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def read_prompts(args: argparse.Namespace) -> list[bytes]:
    """The prompts' bytes in command-line order (texts first, then files); ``ValueError`` for a
    missing, unreadable or non-UTF-8 prompt file, or no prompt at all."""
    prompts = [text.encode("utf-8", errors="surrogateescape") for text in args.prompt]
    for path in args.prompt_file:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ValueError(f"--prompt-file {path!r}: {exc.strerror or exc}") from None
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompt-file {path!r} is not UTF-8 text (byte {exc.start}); "
                             "allowed: UTF-8 text files") from None
        prompts.append(data)
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT and/or --prompt-file PATH")
    return prompts


def _check_numbers(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.speculative < 0:
        raise ValueError(f"--speculative must be >= 0 (0 = off), got {args.speculative}")
    from megacpp_mcore.infer.mixers import VERIFY_STATES

    if args.ssd_verify not in VERIFY_STATES:
        raise ValueError(f"--ssd-verify {args.ssd_verify!r}; allowed: {', '.join(VERIFY_STATES)}")
    if args.plain_width < 1:
        raise ValueError(f"--plain-width must be >= 1, got {args.plain_width}")
    if args.plain_width > 1 and args.speculative:
        raise ValueError(f"--plain-width {args.plain_width} shapes plain decoding like a verification; "
                         f"allowed with --speculative {args.speculative}: --plain-width 1")
    if args.cuda_graphs:
        import torch

        if args.temperature > 0:
            raise ValueError("--cuda-graphs is built for greedy decoding (plain or speculative); "
                             f"allowed with --temperature {args.temperature}: leave --cuda-graphs off")
        if not torch.cuda.is_available():
            raise ValueError("--cuda-graphs needs a CUDA device; none is visible here")
    if args.compile_speculative and not (args.cuda_graphs and args.speculative >= 1):
        raise ValueError("--compile-speculative compiles the graphed speculative step; "
                         "allowed with --cuda-graphs and --speculative K >= 1 (got "
                         f"{'--cuda-graphs' if args.cuda_graphs else 'no --cuda-graphs'}, "
                         f"--speculative {args.speculative})")
    if args.seq_length is not None and args.seq_length < 2:
        raise ValueError(f"--seq-length must be >= 2, got {args.seq_length}")


def _named_model(args: argparse.Namespace):
    """The model the flags name, or None to find it from the checkpoint."""
    if args.preset is None and args.pattern is None and args.num_layers is None:
        return None
    from megacpp_mcore.cli.plan import model_from_args

    return model_from_args(argparse.Namespace(preset=args.preset or "nam56r-tiny",
                                              pattern=args.pattern, num_layers=args.num_layers))


def run(args: argparse.Namespace) -> int:
    import warnings

    from megacpp_mcore.cli.train import QUIET_WARNINGS

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    # torch.distributed.checkpoint's deprecation notices while megatron-core loads the weights:
    # about upstream's API use, nothing a user of `generate` can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing")
    from megacpp_mcore.infer import checkpoint as ckpt
    from megacpp_mcore.infer.decode import check_prompts
    from megacpp_mcore.infer.sampling import Sampling
    from megacpp_mcore.spec.backends import resolve_backend_name

    # --- everything checked before the model is built
    _check_numbers(args)
    resolve_backend_name(args.backend)
    found = ckpt.open_checkpoint(args.load)
    tokenizer = ckpt.tokenizer(found)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        vocab_limit=tokenizer.vocab_size)
    prompts = [[tokenizer.eod, *(int(t) for t in tokenizer.tokenize(data))] for data in read_prompts(args)]
    model = ckpt.resolve_model(found, _named_model(args), args.seq_length)
    if args.speculative and not model.mtp_depth:
        raise ValueError(f"--speculative {args.speculative}: the checkpoint's model {model.name} "
                         "has no MTP block (trained with mtp_depth=0); use --speculative 0")
    if args.speculative > model.mtp_depth:
        raise ValueError(f"--speculative {args.speculative} is beyond the trained MTP depth "
                         f"{model.mtp_depth} of {model.name}; allowed: 0..{model.mtp_depth}")
    check_prompts(prompts, model.seq_length)

    # --- load and generate
    from megacpp_mcore.infer.decode import generate
    from megacpp_mcore.infer.engine import Engine
    from megacpp_mcore.train import runtime

    try:  # load_model starts the 1-rank world; it ends here
        engine = Engine(ckpt.load_model(found, model, backend=args.backend, bf16=args.bf16))
        engine.ssd_verify = args.ssd_verify
        result = generate(engine, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          speculative=args.speculative, stop_tokens=(tokenizer.eod, tokenizer.pad),
                          cuda_graphs=args.cuda_graphs, compile_speculative=args.compile_speculative,
                          plain_width=args.plain_width)
    finally:
        runtime.shutdown()
    texts = [tokenizer.decode_bytes(row) for row in result.tokens]
    if args.json:
        report = {"checkpoint": str(found.path), "step": found.step, "model": model.name,
                  "sampling": {"temperature": args.temperature, "top_p": args.top_p,
                               "seed": args.seed},
                  "rows": [{"tokens": row, "text": text.decode("utf-8", errors="replace"),
                            "stop": stop}
                           for row, text, stop in zip(result.tokens, texts, result.stop)],
                  **result.summary()}
        print(json.dumps(report))
        return 0
    out = sys.stdout.buffer
    for i, text in enumerate(texts):
        if len(texts) > 1:
            out.write(f"=== prompt {i + 1} ===\n".encode())
        out.write(text + b"\n")
    out.flush()
    line = (f"{result.new_tokens} tokens, decode {result.decode_tokens_per_s:.1f} tokens/s "
            f"(prefill {result.prefill_s:.2f} s)")
    if args.speculative:
        line += ", acceptance per draft position " + ", ".join(f"{a:.2f}" for a in result.acceptance)
    print(line, file=sys.stderr)
    return 0
