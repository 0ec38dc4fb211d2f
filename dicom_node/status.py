"""Named DIMSE status codes the node answers with (PS3.4 B.2.3, J.3.2.1.3)."""

SUCCESS = 0x0000
# C-STORE failures: 0xA7xx out of resources (the sender should retry later)
OUT_OF_RESOURCES_DISK_FLOOR = 0xA700
OUT_OF_RESOURCES_WRITE_FAILED = 0xA701
OUT_OF_RESOURCES_DATABASE = 0xA702
OUT_OF_RESOURCES_TOO_LARGE = 0xA703
# 0xA9xx: data set does not match SOP class / command
DATASET_DOES_NOT_MATCH = 0xA900
# 0xCxxx: cannot understand
CANNOT_UNDERSTAND = 0xC210
INVALID_UID = 0xC211
MALFORMED_DATASET = 0xC212
PIXEL_DATA_MISMATCH = 0xC213
PROCESSING_FAILURE = 0x0110

# Storage Commitment failure reasons (PS3.3 C.14.1.1)
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119

NAMES = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES_DISK_FLOOR: "Refused: out of resources (free disk under the floor)",
    OUT_OF_RESOURCES_WRITE_FAILED: "Refused: out of resources (could not write to storage)",
    OUT_OF_RESOURCES_DATABASE: "Refused: out of resources (database unavailable)",
    OUT_OF_RESOURCES_TOO_LARGE: "Refused: out of resources (data set over CT_TRIAGE_MAX_INSTANCE_MB when inflated)",
    DATASET_DOES_NOT_MATCH: "Error: data set does not match SOP class",
    CANNOT_UNDERSTAND: "Error: cannot understand (unparseable data set)",
    INVALID_UID: "Error: cannot understand (invalid UID)",
    MALFORMED_DATASET: "Error: cannot understand (data set truncated or an element length past its end)",
    PIXEL_DATA_MISMATCH: "Error: cannot understand (Pixel Data length or encapsulation does not match the image)",
    PROCESSING_FAILURE: "Processing failure",
}
