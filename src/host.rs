//! The machine lucidgate runs on: its host name and addresses, as the CA (server certificate
//! names), mDNS (the announced host) and provisioning (result files) see them.

use std::net::IpAddr;

/// The host name (`gethostname`), if the system has a readable one.
pub(crate) fn name() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
}

/// The addresses of the machine's interfaces, without IPv6 link-local ones (they need a scope
/// and are not used to reach a Pi).
pub(crate) fn addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            a.address.and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
        })
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .collect()
}
