"""Which engine `flora serve` schedules on: transformers' continuous batching, or flora's own.

Both are continuous batching over transformers' model code. transformers' (`generate_batch`,
``ContinuousBatchingManager``) keeps a paged key/value cache and packs every running request
into one sequence ``[1, tokens]``; per-row adapters would there have to become per-token-segment
routing (the S-LoRA/Punica form), and prompt and prefix tuning (virtual tokens in front of a
request, a pre-filled cache) have no place in its inputs. flora's engine (`flora.serve.engine`)
keeps one cache slot per request (`flora.serve.slot_cache`) and routes rows.

The same requests, all submitted at once (offline), greedy, a fixed number of new tokens each:

- ``transformers_cb``: the bare model through ``generate_batch`` (its default configuration);
- ``flora_engine``: the bare model through flora's engine;
- ``flora_engine_lora``: flora's engine with ``--adapters`` distinct LoRA r8 adapters (every linear
  layer), one per request in turn: what transformers' engine cannot run.

Reports output tokens/s per system (median over ``--rounds``, systems interleaved) and whether the
two engines' greedy tokens agree. Usage:

    python benchmarks/engine_choice.py --json benchmarks/results/engine_choice.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
from pathlib import Path

import torch
from harness import Case, measure, randomize, token_rows, write_json
from transformers import GenerationConfig

from flora import AdapterModel, LoraConfig
from flora.serve import ServeSettings, build_state
from flora.serve.engine import EngineRequest, Finished, SamplingParams, Token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = AdapterModel.from_pretrained(args.model)
    prompts = [row.tolist() for row in token_rows(model.tokenizer, args.requests, args.prompt_tokens)]
    names = [f"lora{i}" for i in range(args.adapters)]
    adapter_dir = Path(tempfile.mkdtemp(prefix="engine-choice-"))
    for i, name in enumerate(names):  # saved, then served from --adapter-dir as a user would
        model.add_adapter(name, LoraConfig(r=8, alpha=16))
        randomize(model.adapter_parameters(name), seed=i)
        model.save_adapter(name, adapter_dir / name)
        model.delete_adapter(name)
    settings = ServeSettings(model=args.model, adapter_dir=str(adapter_dir), max_num_seqs=args.requests,
                             max_loaded_adapters=max(args.adapters, 1))  # fmt: skip
    state = build_state(settings, model=model)
    engine = state.engine
    generation = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=model.tokenizer.pad_token_id)  # fmt: skip
    outputs: dict[str, list[list[int]]] = {}

    def transformers_cb() -> None:
        with torch.no_grad():
            results = model.base_model.generate_batch(prompts, generation_config=generation, progress_bar=False)
        outputs["transformers_cb"] = [list(r.generated_tokens) for r in sorted(results.values(), key=_order)]

    def flora_engine(adapters: list[str | None], key: str):
        def run() -> None:
            tokens = [[] for _ in prompts]
            done = threading.Semaphore(0)
            for row, prompt in enumerate(prompts):
                adapter = adapters[row % len(adapters)]
                lease = None if adapter is None else state.registry.lease(adapter)[0]

                def emit(event, row=row):
                    if isinstance(event, Token):
                        tokens[row].append(event.token_id)
                    elif isinstance(event, Finished):
                        done.release()

                params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
                engine.submit(EngineRequest(f"{key}-{row}", prompt, params, lease, emit))
            for _ in prompts:
                done.acquire()
            outputs[key] = tokens

        return run

    cases = [
        Case({"system": "transformers_cb", "adapters": 0}, transformers_cb),
        Case({"system": "flora_engine", "adapters": 0}, flora_engine([None], "flora_engine")),
        Case({"system": "flora_engine_lora", "adapters": args.adapters}, flora_engine(names, "flora_engine_lora")),
    ]
    measure(cases, args.rounds)
    engine.stop()
    shutil.rmtree(adapter_dir)
    tokens = args.requests * args.new_tokens
    records = [{**c.record, "tokens_per_s": round(tokens / c.median_s, 2), "seconds": [round(s, 3) for s in c.seconds]}
               for c in cases]  # fmt: skip
    agree = outputs["transformers_cb"] == outputs["flora_engine"]
    for record in records:
        print(f"{record['system']:<20} {record['tokens_per_s']:8.1f} tokens/s")
    print(f"greedy tokens of the two engines (bare model) identical: {agree}")
    if args.json:
        write_json(args.json, {"benchmark": "engine_choice", "model": args.model, "requests": args.requests,
                               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                               "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
                               "records": records, "greedy_tokens_identical": agree})  # fmt: skip


def _order(output) -> int:
    return int(output.request_id.rsplit("_", 1)[-1]) if output.request_id.rsplit("_", 1)[-1].isdigit() else 0


if __name__ == "__main__":
    main()
