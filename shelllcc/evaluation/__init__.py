"""Evaluation: detail and spectrum metrics (``detail``), the attribute classifier whose features also
serve the Frechet distance (``classifier``, ``frechet``), media writers (``media``) and the report's
plots, montages and tables (``report``)."""
