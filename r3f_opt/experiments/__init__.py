"""The experiment tools: GLUE data and metrics (:mod:`.glue`), shared data and file helpers (:mod:`.data`),
what the command lines share (:mod:`.cli`), and the command lines ``r3f-finetune`` (:mod:`.finetune`),
``r3f-report`` (:mod:`.report`) and ``r3f-probe`` (:mod:`.probe`). Nothing in the core imports this package."""
