"""SelectiveTrainer as a drop-in for a Trainer with a loss_mask column (README, "Already using
transformers.Trainer?"). Here: train a tiny Llama only on the answers of the built-in corpus.
On a real setup, swap the tiny model and tokenizer for e.g. microsoft/phi-2.

    python scripts/trainer_example.py [OUTPUT_DIR]
"""

import sys

from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForLanguageModeling, TrainingArguments

from slm import SelectiveTrainer
from slm.data import CorpusConfig, builtin_tokenizer
from slm.data.builtin import arithmetic_documents
from slm.trainers import SelectiveDataCollator

out = sys.argv[1] if len(sys.argv) > 1 else "outputs/trainer_example"
tok = builtin_tokenizer()  # on a real setup: AutoTokenizer.from_pretrained("microsoft/phi-2")
config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
model = AutoModelForCausalLM.from_config(config)  # or AutoModelForCausalLM.from_pretrained("microsoft/phi-2")


def with_loss_mask(doc):
    """Tokenise and mark the answer tokens: the only ones this run trains on."""
    enc = tok(doc["text"], return_offsets_mapping=True)
    spans = doc["answer_spans"]
    loss_mask = [any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]
    return {"input_ids": enc["input_ids"], "loss_mask": loss_mask}


docs = Dataset.from_list(arithmetic_documents(CorpusConfig(n_val_docs=400), "validation"))
ds = docs.map(with_loss_mask, remove_columns=docs.column_names).train_test_split(test_size=0.1, seed=0)

trainer = SelectiveTrainer(
    model=model,
    args=TrainingArguments(output_dir=out, max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
                           logging_steps=10, eval_strategy="steps", eval_steps=15, report_to=[], use_cpu=True),
    train_dataset=ds["train"],
    eval_dataset=ds["test"],
    data_collator=SelectiveDataCollator(DataCollatorForLanguageModeling(tok, mlm=False)),
    processing_class=tok,
)  # fmt: skip
trainer.train()
trainer.save_model(out)
print(f"saved to {out}; total FLOPs (head work actually done): {trainer.state.total_flos:.3e}")
