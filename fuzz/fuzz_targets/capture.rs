//! Fuzzes the capture reader: any bytes give batches then an end or a typed error, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_packet_core::capture::{Batch, CaptureReader};

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = CaptureReader::new(data) else { return };
    let mut batch = Batch::default();
    // Each successful call consumes input, so this ends; the bound guards against a regression that loops.
    for _ in 0..=data.len() {
        match reader.next_batch(&mut batch) {
            Ok(true) => {
                for packet in batch.packets() {
                    let _ = vpn_packet_core::extract(packet);
                }
            }
            Ok(false) | Err(_) => return,
        }
    }
    panic!("capture reader did not finish {} bytes of input", data.len());
});
