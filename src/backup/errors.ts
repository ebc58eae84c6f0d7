import { ThinvolError } from "../errors.js";

/**
 * A backup's data at the target is not what its record says: a block is missing, does not
 * decompress, or has the wrong digest, or the record itself cannot be read. The message
 * names the volume, the backup id and the block.
 */
export class BackupDamagedError extends ThinvolError {
  override name = "BackupDamagedError";
}

/** A block a backup names is not at the target at all. */
export class MissingBlockError extends BackupDamagedError {
  override name = "MissingBlockError";
}
