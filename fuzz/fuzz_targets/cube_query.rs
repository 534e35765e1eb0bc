#![no_main]
//! See crmcube::fuzzing::cube_query.
libfuzzer_sys::fuzz_target!(|data: &[u8]| crmcube::fuzzing::cube_query(data));
