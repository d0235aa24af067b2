"""`spp-hf run` and `spp-hf eval`, one job per module (importing this package loads none of them):

    config           PipelineConfig: the settings, YAML loading, --set overrides, the data-separation check
    layout           RunLayout: where each stage writes in runs/<name>/ (read by the report and `spp-hf publish`)
    methods          what a recovery method is, and the registry (`register`, `get_method`)
    builtin_methods  the shipped methods: SPP, masked LoRA, LoRA*, masked full fine-tuning
    variants         the (method, seed, settings) runs a config asks for
    stages           prune, train + merge, evaluate
    evaluation       perplexity and zero-shot measurements, and `evaluation_record`
    results          EvalRecord, the one evaluation record schema (old pipeline records read too); gap closed
    evaluate_model   `evaluate_model`: load a checkpoint or adapter by name and measure it (`spp-hf eval`)
    report           report.md and its plots
    run              run_pipeline: the stages in order
"""
