"""so8t.data: training text (``dataset``: JSONL rows, the thinking tags, chat rendering with the prompt
masked) and the bundled data files with the scripts that write them."""
