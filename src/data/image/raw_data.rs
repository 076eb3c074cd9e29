//! PLACEHOLDER: shared decoding of raw voxel buffers (element type, byte order) for the
//! text-header formats; written by the NRRD/MetaImage helper.
