"""Tasks and their data: reading records, the built-in tasks, one lookup by name, prepare, and the formats.

* :mod:`.readers`: low-level file readers that name ``file:line`` in every :class:`~.readers.DataError`;
* :mod:`.records`: a declared source (local files or a Hugging Face dataset) as located records;
* :mod:`.task`: :class:`~.task.TaskSpec`, what a task is;
* :mod:`.builtin`: the shipped tasks (GLUE, GSM8K, BoolQ) and their raw-file readers;
* :mod:`.catalog`: every task by name (:func:`~.catalog.get_task`: built-in or ``data.datasets``), read and split;
* :mod:`.prepare`: splits, tokenization, ``datasets`` on disk, collators;
* :mod:`.formats`: one module per record format, each owning its rendering, scoring and collator.
"""
