################################################################################
#
# lucidgate
#
################################################################################

LUCIDGATE_VERSION = 0.1.0
LUCIDGATE_SITE = $(call github,lucidgate,lucidgate,v$(LUCIDGATE_VERSION))
LUCIDGATE_LICENSE = MIT
LUCIDGATE_LICENSE_FILES = LICENSE-MIT
LUCIDGATE_DEPENDENCIES = host-pkgconf udev
LUCIDGATE_CARGO_BUILD_OPTS = --bin lucidgate

# The service runs as the static system user lucidgate (User= in the unit; not DynamicUser=,
# whose implied group would clash with this one). Members of group lucidgate may use its control
# socket; dialout gives it the ttys.
define LUCIDGATE_USERS
	lucidgate -1 lucidgate -1 * /var/lib/lucidgate - dialout lucidgate device server
endef

define LUCIDGATE_INSTALL_CONFIG
	$(INSTALL) -D -m 0644 $(@D)/packaging/lucidgate.toml \
		$(TARGET_DIR)/etc/lucidgate/lucidgate.toml
	$(INSTALL) -D -m 0644 $(@D)/systemd/udev/70-lucidgate.rules \
		$(TARGET_DIR)/usr/lib/udev/rules.d/70-lucidgate.rules
	$(INSTALL) -D -m 0644 $(@D)/systemd/modules-load.d/lucidgate.conf \
		$(TARGET_DIR)/etc/modules-load.d/lucidgate.conf
endef
LUCIDGATE_POST_INSTALL_TARGET_HOOKS += LUCIDGATE_INSTALL_CONFIG

define LUCIDGATE_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/systemd/lucidgate.service \
		$(TARGET_DIR)/usr/lib/systemd/system/lucidgate.service
	$(INSTALL) -D -m 0644 $(@D)/systemd/lucidgate-attach@.service \
		$(TARGET_DIR)/usr/lib/systemd/system/lucidgate-attach@.service
endef

$(eval $(cargo-package))
