include $(sort $(wildcard $(BR2_EXTERNAL_LUCIDGATE_PATH)/package/*/*.mk))
