"""The stage side of the pipeline: the runner every ``stages/*.py`` uses (:mod:`.runner`), where stages read
and write (:mod:`.layout`), and the steps of the two big stages (:mod:`.training` for finetune, :mod:`.scoring`
for evaluate), so each entry point reads setup -> run -> write."""
