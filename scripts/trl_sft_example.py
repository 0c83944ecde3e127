"""SelectiveSFTTrainer, TRL's SFTTrainer with slm's selection (docs/trl.md). A tiny Llama trains on the
built-in corpus's prompt-completion pairs for 30 steps (its eval loss falls from about 4.6 to about 2.7:
a start, not a model that has learnt the answers), on the 30% of completion tokens whose loss most exceeds
a reference's. The reference here is a second tiny model, randomly initialised and never trained, so the
excess loss ranks against noise: it shows the wiring, not the saving. On a real setup the reference is a
model fine-tuned on clean data of the target domain (as in Token Cleaning); swap in real models and a chat
dataset as you would with TRL.

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
reference = AutoModelForCausalLM.from_config(config)  # UNTRAINED here: use one fine-tuned on clean data


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
