"""`rlcd-data view`: a local web page to browse a pair dataset and spot-check it blind (a stage above the
quality report and the pair sources it reads; `serve.serve` runs it)."""
