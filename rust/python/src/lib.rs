//! PyO3 bindings of vpn-packet: the module `vpn_packet._native`. Conversions and classes only; the logic
//! lives in the `vpn-packet-core` crate.

use pyo3::prelude::*;

mod ack;
mod buffer;
mod capture;
mod connection;
mod data_plane;
mod ed25519;
mod errors;
mod framing;
mod functions;
mod handshake;
mod key_cache;
mod packet_batch;
mod packet_info;
mod prefix;
mod queues;
mod receive;
mod send;
mod tun_io;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<packet_info::PacketInfo>()?;
    m.add_function(wrap_pyfunction!(functions::extract_ip_and_ports, m)?)?;
    m.add_function(wrap_pyfunction!(functions::destination_key, m)?)?;
    m.add_function(wrap_pyfunction!(functions::destination_key_and_ip, m)?)?;
    m.add_function(wrap_pyfunction!(functions::extract_batch, m)?)?;
    m.add_function(wrap_pyfunction!(functions::extract_batch_from_buffer, m)?)?;
    m.add_function(wrap_pyfunction!(functions::group_by_destination, m)?)?;
    m.add_class::<packet_batch::PacketBatch>()?;
    m.add_function(wrap_pyfunction!(packet_batch::parse_batch, m)?)?;
    m.add_function(wrap_pyfunction!(packet_batch::parse_batch_from_buffer, m)?)?;
    capture::register(m)?;
    framing::register(m)?;
    handshake::register(m)?;
    ed25519::register(m)?;
    ack::register(m)?;
    prefix::register(m)?;
    queues::register(m)?;
    tun_io::register(m)?;
    connection::register(m)?;
    receive::register(m)?;
    data_plane::register(m)?;
    send::register(m)?;
    Ok(())
}
