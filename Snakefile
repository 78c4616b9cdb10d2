# HAMIL reproduction workflow. Every rule is a thin call of the `hamil` CLI.
#   snakemake --cores all                                  full reproduction (config/config.yaml)
#   snakemake --cores all --configfile config/demo.yaml    synthetic demo
#   snakemake bags --cores all                             one stage (targets: acquire crop bags train evaluate figures compare)
#   snakemake --report report.html                         browsable report of the figures and tables

from snakemake.utils import min_version, validate

min_version("9.0")


# The full reproduction by default; a --configfile (demo, tiny, your own) replaces it instead of extending it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/acquire.smk"
include: "workflow/rules/crop.smk"
include: "workflow/rules/bags.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        rules.compare.input,
        rules.figures.input,


onsuccess:
    print_comparisons()
