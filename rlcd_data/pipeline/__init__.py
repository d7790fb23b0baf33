"""The build (`rlcd-data build`): plan, decode with retries, label, stage, write the dataset folder.

The folder is `pipeline`, not `build`: `rlcd_data.build` is the public function."""
