SUMMARY = "Device server for LucidControl USB IO modules"
DESCRIPTION = "Serves each plugged-in LucidControl USB IO module on a TCP port derived from its serial number, over TLS with client certificates by default, with udev hotplug."
HOMEPAGE = "https://github.com/lucidgate/lucidgate"
BUGTRACKER = "https://github.com/lucidgate/lucidgate/issues"
SECTION = "net"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE-MIT;md5=202e3fd079a54ef57426eeef338e25fc"
CVE_PRODUCT = "lucidgate"

DEPENDS += "udev"

SRC_URI = "git://github.com/lucidgate/lucidgate.git;protocol=https;branch=main \
           file://lucidgate.toml \
           "
SRCREV = "0000000000000000000000000000000000000000"
# scarthgap unpacks into WORKDIR, styhead and later into UNPACKDIR.
UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}/git"

inherit cargo cargo-update-recipe-crates pkgconfig systemd useradd

require ${BPN}-crates.inc

CARGO_BUILD_FLAGS += "--bin lucidgate"

SYSTEMD_SERVICE:${PN} = "lucidgate.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/lucidgate.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/lucidgate-attach@.service ${D}${systemd_system_unitdir}/
    install -d ${D}${sysconfdir}/lucidgate
    install -m 0644 ${UNPACKDIR}/lucidgate.toml ${D}${sysconfdir}/lucidgate/lucidgate.toml
    install -d ${D}${sysconfdir}/modules-load.d
    install -m 0644 ${S}/systemd/modules-load.d/lucidgate.conf ${D}${sysconfdir}/modules-load.d/
    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${S}/systemd/udev/70-lucidgate.rules ${D}${nonarch_base_libdir}/udev/rules.d/
}

CONFFILES:${PN} = "${sysconfdir}/lucidgate/lucidgate.toml"
FILES:${PN} += "${systemd_system_unitdir}/lucidgate.service \
                ${systemd_system_unitdir}/lucidgate-attach@.service \
                ${sysconfdir}/modules-load.d/lucidgate.conf \
                ${nonarch_base_libdir}/udev/rules.d/70-lucidgate.rules \
                "
# The unit runs as the static system user "lucidgate" (User= in the unit, not DynamicUser=,
# whose implied group would clash with the static group); members of group "lucidgate" may use
# its control socket; dialout (given by the unit) the ttys.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system lucidgate"
USERADD_PARAM:${PN} = "--system --gid lucidgate --home-dir ${localstatedir}/lib/lucidgate --no-create-home --shell ${base_sbindir}/nologin lucidgate"
RRECOMMENDS:${PN} += "kernel-module-cdc-acm kernel-module-sd-mod"
