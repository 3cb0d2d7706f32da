"""train/gfl"""
