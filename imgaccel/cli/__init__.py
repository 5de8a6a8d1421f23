"""Click commands; thin: parse arguments, call the library, print results."""
