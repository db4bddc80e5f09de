"""Train the bundled tiny chat model (localv3/assets/tiny) on CPU, from nothing, reproducibly.

    python scripts/train_tiny.py [--out localv3/assets/tiny] [--steps N] [--seed 0] [--lr 3e-3]
                                 [--continue-from MODEL_DIR]

1. trains a byte-level BPE tokenizer (digits split one per token) on generated questions;
2. trains a tiny DeepSeek-V3: MLA (q/kv LoRA, rope split), one dense first layer, MoE layers
   with routed experts + a shared expert, sigmoid routing with group-limited top-k and the
   aux-loss-free correction bias, and one MTP layer under DeepSeek's MTP objective
   (loss = L_main + lambda * L_mtp, the MTP layer predicting token t+2);
3. writes a Hugging Face-format directory: config.json, model.safetensors (real tensor names,
   MTP layer as model.layers.{num_hidden_layers}.*), tokenizer.json, tokenizer_config.json with
   a DeepSeek-style chat template, generation_config.json.

Data comes from localv3.tinydata; its held-out operand sets are never trained on. Each batch
is conversations of one turn count, drawn uniformly from 1..12 per step, so every answer is
learnt after no, few or many earlier turns (a chat's late turns sit at positions up to ~400).
--continue-from trains a model this script wrote further (its tokenizer and weights, a fresh
learning-rate schedule); training.json then lists the earlier stages under continued_from.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from localv3.config import ModelConfig
from localv3.loader import checkpoint_name, expert_tensor_names
from localv3.model.moe import DenseExpertBank, MoE
from localv3.model.transformer import Transformer
from localv3.synthetic import TINY_V3
from localv3.tinydata import Example, corpus_texts, training_turns

REPO = Path(__file__).resolve().parent.parent
BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT]  # ids 0..3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

# The synthetic test model's architecture (sigmoid routing, group-limited top-k, MTP), grown
# to a size that learns the tasks; fp32 with no YaRN at this context length.
MODEL_CONFIG = {
    **TINY_V3,
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 384,
    "moe_intermediate_size": 96,
    "num_hidden_layers": 6,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "max_position_embeddings": 512,
    "rope_scaling": None,
    "attention_bias": False,
    "torch_dtype": "float32",
}


@dataclass
class TrainSettings:
    steps: int = 3500
    batch_tokens: int = 1536  # per step, padding included
    max_turns: int = 12  # a row is one conversation of 1..max_turns turns (uniform), one count per step
    max_len: int = MODEL_CONFIG["max_position_embeddings"]  # a conversation stops before the turn that passes it
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    mtp_lambda: float = 0.3  # DeepSeek-V3: 0.3 for most of training
    bias_update_speed: float = 5e-3  # gamma of the aux-loss-free balancing (DeepSeek: 1e-3 over 14T tokens)
    seed: int = 0


# ----- tokenizer ------------------------------------------------------------------------
def train_tokenizer(vocab_size: int, seed: int) -> HFTokenizer:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_texts(20000, seed), trainer)
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def encode_turn(tokenizer: HFTokenizer, turn: Example) -> tuple[list[int], list[bool]]:
    """One turn's chat-template token ids and, per token, whether it is an answer token (trained on)."""
    question = [tokenizer.token_to_id(USER)] + tokenizer.encode(turn.question).ids + [tokenizer.token_to_id(ASSISTANT)]
    answer = tokenizer.encode(turn.answer).ids + [tokenizer.token_to_id(EOS)]
    return question + answer, [False] * len(question) + [True] * len(answer)


def encode_conversation(
    tokenizer: HFTokenizer, turns: Iterator[Example], n_turns: int, max_len: int
) -> tuple[list[int], list[bool]]:
    """A conversation of the next `n_turns` turns (fewer where a turn would pass max_len tokens;
    that turn is dropped) -> its token ids and answer flags."""
    ids, targets = [tokenizer.token_to_id(BOS)], [False]
    for turn_number in range(n_turns):
        turn_ids, turn_targets = encode_turn(tokenizer, next(turns))
        if turn_number and len(ids) + len(turn_ids) > max_len:
            break
        ids, targets = ids + turn_ids, targets + turn_targets
    return ids[:max_len], targets[:max_len]


def make_batch(
    tokenizer: HFTokenizer, turns: Iterator[Example], n_turns: int, settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conversations of `n_turns` turns, as many as fit in settings.batch_tokens once right-padded
    to the longest (at least one) -> tokens [B, S] (padded with EOS), answer mask [B, S]."""
    rows: list[tuple[list[int], list[bool]]] = []
    longest = 0
    while True:
        ids, targets = encode_conversation(tokenizer, turns, n_turns, settings.max_len)
        if rows and (len(rows) + 1) * max(longest, len(ids)) > settings.batch_tokens:
            break
        rows.append((ids, targets))
        longest = max(longest, len(ids))
    tokens = torch.full((len(rows), longest), tokenizer.token_to_id(EOS), dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for row, (ids, targets) in enumerate(rows):
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = torch.tensor(targets)
    return tokens, mask


# ----- model ------------------------------------------------------------------------------
def init_weights(model: Transformer, config: ModelConfig, generator: torch.Generator) -> None:
    """Normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2 * layers); norms 1."""
    out_std = 0.02 / math.sqrt(2 * (config.num_hidden_layers + 1))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # every RMSNorm, the MTP layer's enorm/hnorm included
                param.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down")):
                param.normal_(0.0, out_std, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)


class LoadBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing: after each step, nudge each expert's
    correction bias by gamma towards equal load (down if overloaded, up if underloaded)."""

    def __init__(self, model: Transformer, gamma: float):
        self.gamma = gamma
        self.layers = [m for m in model.modules() if isinstance(m, MoE)]
        self.loads = [torch.zeros(m.gate.n_experts) for m in self.layers]
        self.valid: torch.Tensor | None = None  # [B, S] tokens that count (not padding)
        for i, moe in enumerate(self.layers):
            moe.routing_observer = lambda indices, i=i: self._observe(i, indices)

    def _observe(self, layer: int, indices: torch.Tensor) -> None:
        if self.valid is not None:  # the MTP layer routes positions 0..S-2 only
            bsz = self.valid.shape[0]
            indices = indices[self.valid[:, : indices.shape[0] // bsz].flatten()]  # [T, k]
        self.loads[layer] += torch.bincount(indices.flatten(), minlength=self.loads[layer].numel())

    @torch.no_grad()
    def update(self) -> float:
        """Apply the bias update; -> the worst layer's max load / mean load (1.0 = balanced)."""
        worst = 1.0
        for moe, load in zip(self.layers, self.loads):
            mean = load.mean()
            moe.gate.e_score_correction_bias += self.gamma * torch.sign(mean - load)
            worst = max(worst, float(load.max() / mean.clamp(min=1)))
            load.zero_()
        return worst


def losses(model: Transformer, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (main next-token loss, MTP loss on token t+2), both over answer tokens only."""
    bsz, seq = tokens.shape
    cache = model.new_cache(seq, batch_size=bsz)
    logits, hidden = model(tokens, 0, cache)  # [B, S, V], [B, S, D]
    main = F.cross_entropy(logits[:, :-1][mask[:, 1:]], tokens[:, 1:][mask[:, 1:]])
    # the MTP module at position i sees h_i and token i+1, and predicts token i+2
    mtp_logits, _ = model.mtp_forward(hidden[:, :-1], tokens[:, 1:], 0, cache)  # [B, S-1, V]
    mtp = F.cross_entropy(mtp_logits[:, :-1][mask[:, 2:]], tokens[:, 2:][mask[:, 2:]])
    return main, mtp


def train(model: Transformer, tokenizer: HFTokenizer, settings: TrainSettings) -> dict:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )

    def lr_factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    balancer = LoadBalancer(model, settings.bias_update_speed)
    turns = training_turns(settings.seed)
    turn_counts = random.Random(settings.seed)
    model.train()
    started = time.perf_counter()
    main_avg = mtp_avg = None
    for step in range(settings.steps):
        tokens, mask = make_batch(tokenizer, turns, turn_counts.randint(1, settings.max_turns), settings)
        balancer.valid = (tokens != tokenizer.token_to_id(EOS)) | mask  # padding is EOS outside answers
        main, mtp = losses(model, tokens, mask)
        optimizer.zero_grad(set_to_none=True)
        (main + settings.mtp_lambda * mtp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        imbalance = balancer.update()
        main_avg = main.item() if main_avg is None else 0.98 * main_avg + 0.02 * main.item()
        mtp_avg = mtp.item() if mtp_avg is None else 0.98 * mtp_avg + 0.02 * mtp.item()
        if step % 100 == 0 or step == settings.steps - 1:
            elapsed = time.perf_counter() - started
            print(
                f"step {step:5d}  loss {main_avg:.4f}  mtp {mtp_avg:.4f}  max/mean load {imbalance:.2f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {elapsed:.0f}s",
                flush=True,
            )
    for moe in balancer.layers:
        moe.routing_observer = None
    model.eval()
    return {"steps": settings.steps, "loss": main_avg, "mtp_loss": mtp_avg, "seconds": time.perf_counter() - started}


# ----- export -----------------------------------------------------------------------------
def hf_tensors(model: Transformer, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameters -> Hugging Face DeepSeek-V3 tensor names (experts unstacked, MTP copies)."""
    banks = {name for name, m in model.named_modules() if isinstance(m, DenseExpertBank)}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        bank, _, leaf = name.rpartition(".")
        if bank in banks:
            prefix = checkpoint_name(config, bank)
            for expert in range(tensor.shape[0]):
                names = expert_tensor_names(prefix, expert)
                if leaf == "gate_up":
                    gate, up = tensor[expert].chunk(2)  # [I, D] each
                    tensors[names["gate_proj"]], tensors[names["up_proj"]] = gate, up
                else:
                    tensors[names["down_proj"]] = tensor[expert]
        else:
            tensors[checkpoint_name(config, name)] = tensor
    for depth in range(config.num_nextn_predict_layers):
        layer = config.num_hidden_layers + depth
        tensors[f"model.layers.{layer}.shared_head.head.weight"] = tensors["lm_head.weight"]
        tensors[f"model.layers.{layer}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    return {name: t.detach().float().contiguous().clone() for name, t in tensors.items()}


def load_hf_tensors(model: Transformer, config: ModelConfig, directory: Path) -> None:
    """A model directory's weights (as hf_tensors names them) into our parameters, to continue training."""
    banks = {name for name, m in model.named_modules() if isinstance(m, DenseExpertBank)}
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    state = {}
    for name, tensor in model.state_dict().items():
        bank, _, leaf = name.rpartition(".")
        if bank not in banks:
            state[name] = stored[checkpoint_name(config, name)]
            continue
        experts = [expert_tensor_names(checkpoint_name(config, bank), e) for e in range(tensor.shape[0])]
        if leaf == "gate_up":  # [E, 2I, D]
            state[name] = torch.stack([torch.cat([stored[n["gate_proj"]], stored[n["up_proj"]]]) for n in experts])
        else:  # [E, D, I]
            state[name] = torch.stack([stored[n["down_proj"]] for n in experts])
    model.load_state_dict(state)


def write_model_dir(out: Path, model: Transformer, config: ModelConfig, tokenizer: HFTokenizer, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(model, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    generation = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False, "max_new_tokens": 64}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "localv3" / "assets" / "tiny")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument(
        "--continue-from", type=Path, help="a model this script wrote: keep its tokenizer and weights, train on"
    )
    # one thread: on the shared 2-core machine, two threads ran 3-5x slower (spin-waiting)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    settings = TrainSettings(steps=args.steps, seed=args.seed, lr=args.lr)

    config = ModelConfig.from_dict(MODEL_CONFIG)
    model = Transformer(config)
    if args.continue_from:
        tokenizer = HFTokenizer.from_file(str(args.continue_from / "tokenizer.json"))
        load_hf_tensors(model, config, args.continue_from)
    else:
        tokenizer = train_tokenizer(MODEL_CONFIG["vocab_size"], args.seed)
        init_weights(model, config, torch.Generator().manual_seed(args.seed))
    assert tokenizer.get_vocab_size() <= MODEL_CONFIG["vocab_size"]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; model: {n_params / 1e6:.2f}M parameters", flush=True)
    info = train(model, tokenizer, settings)
    info.update(seed=args.seed, parameters=n_params, settings=settings.__dict__)
    if args.continue_from:
        before = json.loads((args.continue_from / "training.json").read_text())
        info["continued_from"] = before.get("continued_from", []) + [{k: before[k] for k in ("steps", "loss", "seconds", "settings")}]
    write_model_dir(args.out, model, config, tokenizer, info)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
