"""LightningDataModules: image–caption WebDataset shards and instruction data."""

from datamodules.instructions import InstructionData, InstructionDataset, load_records
from datamodules.webdataset_captions import WebDatasetCaptions

__all__ = ["InstructionData", "InstructionDataset", "WebDatasetCaptions", "load_records"]
