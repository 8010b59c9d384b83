"""converters: importers, encoders, exporters and the command-line tools of resmoe."""
