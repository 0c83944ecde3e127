"""SelectiveSFTTrainer, TRL's SFTTrainer with slm's selection (README, "With TRL"). A tiny Llama learns
the built-in corpus's answers from prompt-completion pairs; it trains the 30% of completion tokens
whose loss most exceeds a reference's (here a second tiny model; on a real setup, a model fine-tuned
on clean data, as in Token Cleaning). Swap in real models and a chat dataset as you would with TRL.

    python scripts/trl_sft_example.py [OUTPUT_DIR]
"""

import sys

from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM
from trl import SFTConfig

from slm.data import CorpusConfig, builtin_tokenizer
from slm.data.builtin import arithmetic_documents
from slm.trainers import SelectiveSFTTrainer

out = sys.argv[1] if len(sys.argv) > 1 else "outputs/trl_sft_example"
tok = builtin_tokenizer()  # on a real setup: AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
model = AutoModelForCausalLM.from_config(config)  # or AutoModelForCausalLM.from_pretrained(...)
reference = AutoModelForCausalLM.from_config(config)  # or a model fine-tuned on clean data (a path works too)


def prompt_completion(doc):
    """Split a built-in document at its first answer: TRL trains the completion only."""
    start = doc["answer_spans"][0][0]
    return {"prompt": doc["text"][:start], "completion": doc["text"][start:]}


docs = Dataset.from_list(arithmetic_documents(CorpusConfig(n_val_docs=400), "validation"))
ds = docs.map(prompt_completion, remove_columns=docs.column_names).train_test_split(test_size=0.1, seed=0)

trainer = SelectiveSFTTrainer(
    model=model,
    args=SFTConfig(output_dir=out, max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=10,
                   eval_strategy="steps", eval_steps=15, report_to=[], use_cpu=True, save_strategy="no"),
    train_dataset=ds["train"],
    eval_dataset=ds["test"],
    processing_class=tok,
    selection_ratio=0.3,         # 1.0 trains exactly what TRL's SFTTrainer trains
    selector="excess_loss",      # or train_loss (no reference), reference_loss, random
    reference=reference,
)  # fmt: skip
trainer.train()
trainer.save_model(out)
print(f"saved to {out}; logged: {trainer.state.log_history[-2]}")
